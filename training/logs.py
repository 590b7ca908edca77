"""Run records: one JSONL line each (plus TensorBoard when installed), and a PNG of the curves."""
from __future__ import annotations

import json
from pathlib import Path

STAGES = ("sft", "dpo")


def _position(record: dict) -> tuple[int, int]:
    return STAGES.index(record["stage"]), record["step"]


class RunLog:
    def __init__(self, out_dir: Path, *, tensorboard: bool, resume_from: tuple[str, int] | None,
                 enabled: bool = True):
        self.path = out_dir / "log.jsonl"
        self.enabled = enabled  # off on every rank but the first under torchrun
        self.writer = None
        if not enabled:
            return
        if resume_from is None:
            self.path.write_text("")
        else:
            # Drop what a crashed run logged after its last checkpoint; the resumed run logs it again.
            keep = [r for r in self.records() if _position(r) <= (STAGES.index(resume_from[0]), resume_from[1])]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                pass

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            offset = 0 if record["stage"] == "sft" else 10 ** 6  # one x-axis for both stages
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(f"{record['stage']}/{record['kind']}/{key}", value, offset + record["step"])

    def plot(self, path: Path) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure = curves_figure(self.records())
        figure.savefig(path, dpi=100)
        plt.close(figure)


def curves_figure(records: list[dict]):
    """One panel per quantity, each on its own stage's steps: SFT's loss apart from the preference stage's."""
    import matplotlib.pyplot as plt

    panels = [("sft", "loss", "SFT loss", "NLL per completion token"),
              ("dpo", "loss", "preference loss", "mean loss"),
              ("dpo", "rewards/accuracies", "reward accuracy", "fraction chosen > rejected"),
              ("dpo", "rewards/margins", "reward margin", "chosen - rejected reward"),
              ("dpo", "win_rate", "scorer win rate", "fraction of samples correct")]
    panels = [panel for panel in panels if any(r["stage"] == panel[0] and panel[1] in r for r in records)]
    rounds = [r for r in records if r["kind"] == "eval" and "round" in r]
    figure, axes = plt.subplots(1, len(panels) + bool(rounds), figsize=(4.2 * (len(panels) + bool(rounds)), 3.5),
                                squeeze=False)
    if rounds:
        round_panel(axes[0][-1], rounds)
    for axis, (stage, key, title, ylabel) in zip(axes[0], panels):
        for kind, style in (("train", "-"), ("eval", "o-")):
            points = [(r["step"], r[key]) for r in records if r["stage"] == stage and r["kind"] == kind and key in r]
            if points:
                axis.plot(*zip(*points), style, label=kind, markersize=3)
        axis.set_title(title)
        axis.set_xlabel("SFT step" if stage == "sft" else "preference step")
        axis.set_ylabel(ylabel)
        axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def round_panel(axis, rounds: list[dict]) -> None:
    """Online runs: each round's win rates by the judge, and the task's accuracy when it has one."""
    x = [r["round"] + 1 for r in rounds]
    for key, label in (("win_rate/vs_start", "vs the starting policy"), ("win_rate/vs_previous", "vs the last round"),
                       ("win_rate", "task scorer: correct"), ("pair_yield", "pairs per prompt")):
        if all(key in r for r in rounds):
            axis.plot(x, [r[key] for r in rounds], "o-", label=label, markersize=3)
    axis.set_title("online rounds")
    axis.set_xlabel("round")
    axis.set_ylabel("win rate / fraction")
    axis.set_xticks(x)
    axis.legend(fontsize=8)
