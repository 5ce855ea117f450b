"""``spruce generate`` end to end on tiny model directories (in process)."""

from __future__ import annotations

import json

from spruce.cli import main


def test_generate_json_contract(tiny_dirs, capsys):
    target, draft = tiny_dirs
    args = ["generate", "--prompt", "hi there", "--target", str(target), "--draft", str(draft), "--max-tokens", "6"]
    assert main([*args, "--json"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert set(spec) == {"text", "token_ids", "finish_reason", "stats"}
    assert spec["finish_reason"] in ("stop", "length")
    for key in ("steps", "drafted", "accepted", "mean_accepted_length", "acceptance_by_depth", "wall_time_s"):
        assert key in spec["stats"]
    assert main([*args, "--json", "--no-speculation"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["token_ids"] == spec["token_ids"]
    assert plain["stats"]["drafted"] == 0
    # --ignore-eos: max_tokens tokens whatever is drawn (sampling, so an end-of-text could come early)
    assert main([*args, "--json", "--ignore-eos", "--temperature", "1.0", "--max-tokens", "24"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == 24 and out["finish_reason"] == "length"


def test_generate_tree_flags_and_ngram(tiny_dirs, capsys):
    target, draft = tiny_dirs
    base = ["generate", "--prompt", "abcabcabc", "--target", str(target), "--max-tokens", "5", "--json", "--raw"]
    assert main([*base, "--draft", str(draft), "--tree-depth", "3", "--tree-top-k", "2", "--tree-budget", "4"]) == 0
    tree = json.loads(capsys.readouterr().out)
    assert main([*base, "--drafter", "ngram"]) == 0
    ngram = json.loads(capsys.readouterr().out)
    assert tree["token_ids"] == ngram["token_ids"]


def test_bad_input_is_a_clear_error(tiny_dirs, capsys, tmp_path):
    target, _ = tiny_dirs
    assert main(["generate", "--prompt", "x", "--target", str(target), "--max-tokens", "0"]) == 2
    assert "max_tokens" in capsys.readouterr().err
    assert main(["generate", "--prompt", "x", "--target", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err


def test_generate_static_tree_paths(tiny_dirs, capsys):
    target, draft = tiny_dirs
    base = ["generate", "--prompt", "abcabc", "--target", str(target), "--draft", str(draft), "--max-tokens", "6", "--json", "--raw"]
    assert main([*base, "--tree-paths", "0/1/00/01"]) == 0
    out = json.loads(capsys.readouterr().out)
    sizes = {int(k) for k in out["stats"]["steps_by_tree_size"]}
    assert sizes <= {0, 1, 2, 3, 4} and 4 in sizes
    assert main([*base, "--no-speculation"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == out["token_ids"]
    try:
        main([*base, "--tree-paths", "0/x"])
    except SystemExit as exc:
        assert exc.code == 2
    assert "tree paths" in capsys.readouterr().err


def test_serve_defaults_are_the_contract():
    from spruce.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert (args.port, args.http_port, args.served_model_name) == (50051, 8000, "spruce")
    assert args.target is None and args.draft is None  # the embedded pair
