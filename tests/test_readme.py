import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_readme_has_exactly_two_single_line_setup_commands():
    commands = setup_commands()
    assert len(commands) == 2
    assert all("\n" not in c for c in commands)
    assert commands[0].endswith("python app.py")
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == setup_commands()[1]


def test_torch_is_installed_first_and_alone():
    for command in setup_commands():
        steps = [s.strip() for s in command.split("&&")]
        installs = [s for s in steps if s.startswith("pip install")]
        assert installs[0] == "pip install -q torch==2.13.0"
    requirements = (ROOT / "requirements.txt").read_text()
    assert "torchvision" not in re.sub(r"#.*", "", requirements)
