"""bench.widths: every width timed, the context left as it was found between widths."""

from __future__ import annotations

from bench.widths import main, widths


def test_every_width_is_timed(smollm2_gguf):
    best = widths(smollm2_gguf, 3, 8, 1, 1)
    assert sorted(best) == [1, 2, 3]
    assert all(t > 0 for t in best.values())


def test_it_prints_the_curve_in_one_row_steps(smollm2_gguf, capsys):
    main([str(smollm2_gguf), "--max", "2", "--context", "4", "--repeats", "1",
          "--threads", "1"])
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("V(1)=1.00 V(2)=")
