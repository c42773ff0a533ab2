"""What a study's MLflow pages say: a run's description (its outcome, what it was, the links back
to the study, its cell's seeds and the report) and a launch run's, before and after the report.
Markdown, built here and written by the tracker (ablations/tracking/tracker.py)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional

from model.recipe import recipe_for
from ablations.tracking.names import (REPORT_PATH, artifact_url, md_escape, siblings_url,
                                      study_runs_url)

if TYPE_CHECKING:
    from ablations.design.designs import Cell
    from ablations.design.spec import StudySpec
    from model.config import TrainConfig
    from model.train import TrainResult


def fix_states(cfg: TrainConfig) -> dict[str, str]:
    """on / off / other for every fix, read off the resolved config (so filters work on all fixes)."""
    d = cfg.to_dict()
    out = {}
    for name, fix in recipe_for(cfg).fix_map.items():
        def matches(vals: dict[str, Any]) -> bool:
            return all(d[k] == (list(v) if isinstance(v, tuple) else v) for k, v in vals.items())
        out[name] = "on" if matches(fix.after) else "off" if matches(fix.before) else "other"
    return out


def run_links(experiment_id: str, cell_id: str, launch_run_id: Optional[str]) -> str:
    """The way back from a run's page: the study's runs, the cell's seeds, the report (on the
    launch run; `log_report` re-points runs of other launches at the one that has it)."""
    links = [f"[study runs]({study_runs_url(experiment_id)})",
             f"[this cell's seeds]({siblings_url(experiment_id, cell_id)})"]
    if launch_run_id:
        links.append(f"[report]({artifact_url(experiment_id, launch_run_id, REPORT_PATH)})")
    return "**Back to:** " + " | ".join(links)


def run_note(spec: StudySpec, cell: Cell, seed: int, cfg: TrainConfig, res: TrainResult,
             links: str = "") -> str:
    """The run's description on its MLflow page (Markdown): the links back to the study (first:
    the UI shows a description's first lines only), outcome, then what it was."""
    def num(v: Optional[float], fmt: str = ".3f") -> str:
        return "-" if v is None or not math.isfinite(v) else format(v, fmt)

    lines = [links] if links else []
    lines += [f"**{res.status}** after {res.steps} steps: final val F1 {num(res.final_val_f1)} "
             f"(best {num(res.best_val_f1)}), max grad norm {num(res.max_grad_norm, '.3g')}."]
    if res.first_nonfinite_step is not None:
        where = getattr(res, "first_nonfinite_where", "")
        lines.append(f"First non-finite value at step {res.first_nonfinite_step}"
                     + (f" (`{where}`)" if where else "")
                     + f"; {res.nonfinite_events} non-finite events, {res.skipped_steps} steps "
                       f"skipped, {res.zeroed_steps} zeroed (chart `nonfinite/events`, table "
                       f"`nonfinite_events.csv`).")
    states = fix_states(cfg)
    by = {s: [k for k, v in states.items() if v == s] for s in ("on", "off", "other")}
    lines.append(f"Cell `{cell.label(spec.factors)}`, seed {seed}, study `{spec.name}`. Fixes on: "
                 f"{', '.join(by['on']) or 'none'}; off: {', '.join(by['off']) or 'none'}"
                 + (f"; neither: {', '.join(by['other'])}" if by["other"] else "") + ".")
    lines.append("Every step, NaN included: `curves.csv` (Artifacts). Metrics without a prefix "
                 "are rounded for the table (a diverged run's F1 counts 0); `outcome.*` holds "
                 "the exact values.")
    return "\n\n".join(lines)


def launch_note(study: str, done: int, total: int, gave_up: int, interrupted: bool) -> str:
    """The launch run's description until a report replaces its head with the verdicts."""
    state = ("interrupted: run the same command again to resume" if interrupted else
             f"{gave_up} given up after their retries" if gave_up else
             "complete" if done >= total else "the rest queued for workers")
    return (f"Launch of study `{study}`: **{done}/{total} runs done** ({state}). The verdicts "
            f"and a link to the report appear here once it is written (`runner.py report`, also "
            f"run at the end of `runner.py run`).")


def report_note(verdicts: list[tuple[str, str]], table_md: str, agreement: str, runs: int,
                link: str, launch: str) -> str:
    """The launch run's description once the report is logged. The UI shows its first lines
    until "Show more", under a fade that swallows clicks: the link comes first, then the
    verdicts in one line, the evidence after."""
    head = (f"**Verdicts** ({runs} counted runs): "
            + (", ".join(f"{fix} **{verdict}**" for fix, verdict in verdicts)
               or "no fix of the seed is a factor of this study") + ".")
    parts = [f"**Full report:** [{REPORT_PATH}]({link}) (effects with 95 % CIs, interactions, "
             f"figures; also under Artifacts > report).", head]
    parts += [md_escape(p) for p in (agreement, table_md, launch) if p]
    return "\n\n".join(parts)
