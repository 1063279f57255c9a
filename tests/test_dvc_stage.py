"""Stage log streaming: progress-bar redraws are throttled, everything else passes."""

from tasks.dvc_stage import ProgressThrottle


def test_progress_redraws_are_throttled_but_messages_and_completion_pass():
    throttle = ProgressThrottle(interval=3600)
    bars = [f"pretrain:  {i}%|#   | {i}/100 [00:01<00:10]" for i in range(1, 100)]
    kept = [line for line in ["Running stage 'pretrain':", *bars, "pretrain: 100%|####| 100/100", "done", ""]
            if throttle.keep(line)]
    assert kept == ["Running stage 'pretrain':", bars[0], "pretrain: 100%|####| 100/100", "done"]


def test_progress_passes_again_after_the_interval():
    throttle = ProgressThrottle(interval=0.0)
    assert all(throttle.keep(f"x: {i}%| {i}/9") for i in range(3))
