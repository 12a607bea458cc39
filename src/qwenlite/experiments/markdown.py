"""Every experiment of a sweep as a Markdown table (``report/generated/experiments.md``), for
readers of the repository; the report has the same numbers as LaTeX."""

from __future__ import annotations

from qwenlite.experiments.collect import Sweep


def _num(x, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def results_markdown(sweep: Sweep) -> str:
    flops = {r.experiment: r.total for r in sweep.ledger_rows() if r.source == "sweep"}
    lines = ["| experiment | stage | steps | context | lr | rank | bias | val loss | val MAE | "
             "val median-system MAE | test MAE | FLOPS | commit |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    for name in sweep.names:
        p = sweep.planned(name)
        r = sweep.results.get(name)
        if r is None:
            lines.append(f"| {name} | {p['stage']} | {p['steps']} | pending |||||||||")
            continue
        s, val, test = r["settings"], r["val"], r.get("test")
        lr = "—" if not s["steps"] else f"{s['lr']:g}"
        rank = "—" if not s["steps"] else str(s["rank"])
        lines.append(
            f"| {name} | {r['stage']} | {s['steps']} | {s['context']} | {lr} | {rank} | "
            f"{'on' if s['logit_bias'] else 'off'} | {_num(r.get('val_loss'))} | "
            f"{_num(val['mae'])} | {_num(val['median_system_mae'])} | "
            f"{_num(test['mae'] if test else None)} | {flops.get(name, 0):.3e} | "
            f"{str(r.get('commit', ''))[:7]} |")
    done = sum(n in sweep.results for n in sweep.names)
    lines += ["", f"{done} of {len(sweep.names)} experiments done; the sweep's ledger holds "
              f"{sum(flops.values()):.3e} FLOPS, all ledgers {sweep.ledger_total():.3e} of the "
              f"1e17 budget. Scale {sweep.plan['scale']['name']}"
              f"{' (SHRUNK)' if sweep.plan['shrunk'] else ''}; validation over "
              f"{sweep.plan['scale']['val_systems']} systems, test over "
              f"{sweep.plan['scale']['test_systems']}, "
              f"{sweep.plan['scale']['context_steps']} → {sweep.plan['scale']['horizon']} steps."]
    return "\n".join(lines) + "\n"
