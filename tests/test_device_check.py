"""benchmarks/device_check.py runs end to end at its --smoke size on CPU and prints one line per figure, so it is
ready for the first session that has an accelerator (timings are never asserted)."""

from __future__ import annotations

import re

from benchmarks import device_check

LINE = re.compile(r"^device_check what=(\S+) value=(\S+) reference=(\S+) ratio=(\S+)")


def test_smoke_run_prints_every_figure_with_its_reference_and_ratio(capsys):
    assert device_check.main(["--smoke"]) == 0
    figures = {m.group(1): tuple(float(x) for x in m.groups()[1:])
               for m in map(LINE.match, capsys.readouterr().out.splitlines()) if m}
    assert sorted(figures) == [
        "sampler_tokens_per_s_b4", "sampler_tokens_per_s_b8", "slot_engine_tokens_per_s",
        "transformers_generate_tokens_per_s_b4",
        "transformers_generate_tokens_per_s_b8", "update_tokens_per_s"]
    for what, (value, reference, ratio) in figures.items():
        assert value > 0 and reference > 0, what
        assert abs(ratio - value / reference) <= 1e-3 + 1e-3 * ratio, what
    # transformers' line is measured against ours
    assert figures["transformers_generate_tokens_per_s_b4"][1] == figures["sampler_tokens_per_s_b4"][0]


def test_without_an_accelerator_it_refuses_unless_asked_for_the_smoke_size(capsys):
    assert device_check.main([]) == 2
    assert "JAX sees no accelerator" in capsys.readouterr().err


def test_a_sampler_kernel_that_fails_on_the_device_is_reported_and_the_xla_path_timed(monkeypatch, capsys):
    calls = []

    def sampler(model_config, chip, args):
        calls.append(device_check.resolved_attention(model_config))
        if len(calls) == 1:
            raise RuntimeError("Triton compilation failed:\n  out of shared memory")
        return {4: 1.0, 8: 1.0}

    monkeypatch.setattr(device_check, "check_update_step", lambda *a: None)
    monkeypatch.setattr(device_check, "check_sampler", sampler)
    assert device_check.main(["--smoke", "--attention", "cudnn", "--skip-transformers"]) == 0
    assert calls == ["cudnn", "xla"]
    assert ("device_check what=sampler_failed attention=cudnn error=RuntimeError: Triton compilation failed: out of "
            "shared memory; again with attention=xla") in capsys.readouterr().out
