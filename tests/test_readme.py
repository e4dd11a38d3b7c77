"""The README's usage examples run as written (against the test server instead of the default)."""

import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def usage_examples() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Using it"):text.index("### Client API in brief")]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_three_usage_examples_run(server, capsys):
    examples = usage_examples()
    assert len(examples) == 3
    namespace: dict = {}
    for code in examples:
        code = code.replace('Client("127.0.0.1:50051")', f'Client("{server.target}")')
        code = code.replace("Client()", f'Client("{server.target}")')
        exec(compile(code, str(README), "exec"), namespace)
    assert namespace["embeddings"].shape == (3, 384)
    assert [t.shape[1] for t in namespace["tokens"]] == [384] * 3
    assert [t.shape[1] for t in namespace["layer6"]] == [384] * 3
    assert namespace["middle"].shape == (3, 384)
    assert "(3, 384)" in capsys.readouterr().out
