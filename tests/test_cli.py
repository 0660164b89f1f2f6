"""The ``glm5`` command answers bad input with one readable line and exit status 2, not a traceback."""

import pytest

from glm5.cli import main


@pytest.mark.parametrize("argv, expect", [
    (["generate", "--model", "{tmp}/missing", "--prompt", "hi"], "no config.json"),
    (["rl", "--model", "{tmp}/missing"], "no such directory"),
    (["train", "--preset", "bogus", "--out", "{tmp}/out"], "unknown preset 'bogus'"),
    (["sft", "--preset", "glm5-nano", "--data", "{tmp}/missing.jsonl", "--out", "{tmp}/out"], "neither 'default'"),
])
def test_bad_input_is_one_line_and_status_2(argv, expect, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GLM5_DEBUG", raising=False)
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert f"glm5 {argv[0]}: error:" in err and expect in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_debug_env_reraises(tmp_path, monkeypatch):
    monkeypatch.setenv("GLM5_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "hi"])
