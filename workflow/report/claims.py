"""The claims: the per-cell evidence, the rank correlations between perplexity and downstream scores, the rules that
test the reference study's stated findings (docs/reference-study.md §7), and the findings of the summary.

Each rule returns (verdict, deciding numbers, cells it rests on); the verdicts are supported, not supported and not
testable. The rule names are the `rule` keys of reports/reference/paper.yaml."""
from __future__ import annotations

from dataclasses import dataclass

from workflow import stats
from workflow.report.formatting import fmt_len, fmt_num, fmt_pct


@dataclass
class Evidence:
    """The per-cell numbers that the findings, the correlations and the claims scoreboard rest on."""
    cells: list[dict]
    ppl: dict                # (cell_id, eval_len) -> perplexity
    downstream: dict         # score name -> {cell_id: mean score in [0, 1]}
    base_cell: str | None
    base_window: int | None
    thresholds: dict         # paper.yaml `thresholds`: significance, extrapolation_hard

    @property
    def longest(self) -> int | None:
        return max((length for _, length in self.ppl), default=None)

    def ppl_at(self, length) -> dict:
        return {c: v for (c, l), v in self.ppl.items() if l == length}

    def of(self, pred) -> list[dict]:
        return [c for c in self.cells if c["ok"] and pred(c)]


def correlations(ev: Evidence, downstream: dict, paper: dict) -> list[dict]:
    """Kendall tau between perplexity at the longest length and each downstream mean score, across cells."""
    at_longest = ev.ppl_at(ev.longest)
    out = []
    for name, means in downstream.items():
        common = sorted(c for c in means if c in at_longest)
        tau, p = stats.kendall([at_longest[c] for c in common], [means[c] for c in common])
        ref = paper["kendall"].get(name.split(" ")[0]) or {}
        note = ("fewer than 3 cells" if len(common) < 3 else
                "same score for every cell" if len({means[c] for c in common}) < 2 else
                "same perplexity for every cell" if tau is None else "")
        out.append({"score": name, "n": len(common), "tau": tau, "p": p, "cells": common, "note": note,
                    "paper_task": ref.get("task"), "paper_tau": ref.get("tau"), "paper_p": ref.get("p")})
    return out


def _ratio_beyond(ev: Evidence, cell: dict) -> tuple[float, int] | None:
    """(perplexity at the first evaluated length beyond the training length / at the training length, that length)."""
    own = ev.ppl.get((cell["cell_id"], cell["train_len"]))
    beyond = sorted(l for (c, l) in ev.ppl if c == cell["cell_id"] and l > cell["train_len"])
    if not own or not beyond:
        return None
    return ev.ppl[(cell["cell_id"], beyond[0])] / own, beyond[0]


def _mean_downstream(ev: Evidence, cid: str) -> float | None:
    vals = [m[cid] for m in ev.downstream.values() if m.get(cid) is not None]
    return sum(vals) / len(vals) if vals else None


def rule_ppl_tracks_downstream(ev: Evidence, corr: list[dict]):
    usable = [c for c in corr if c["tau"] is not None and c["p"] is not None]
    if not usable:
        return "not testable", "; ".join(f"{c['score']}: {c['note']}" for c in corr) or "no downstream scores", []
    text = "; ".join(f"{c['score']}: τ = {c['tau']:+.2f}, p = {c['p']:.3f} over {c['n']} cells" for c in usable)
    cited = sorted({x for c in usable for x in c["cells"]})
    if any(c["tau"] >= 0 for c in usable):  # the direction itself disagrees
        return "not supported", text, cited
    alpha = ev.thresholds["significance"]
    if all(c["p"] < alpha for c in usable):
        return "supported", text, cited
    return "not testable", text + f" (negative, but not significant at p < {alpha:g} with this few cells)", cited


def rule_approximate_underperforms(ev: Evidence, corr):
    approx = {c["cell_id"]: _mean_downstream(ev, c["cell_id"]) for c in ev.of(lambda c: c["family"] == "approximate")}
    exact = {c["cell_id"]: _mean_downstream(ev, c["cell_id"])
             for c in ev.of(lambda c: c["family"] == "exact" and c["regime"] == "finetuned")}
    approx = {k: v for k, v in approx.items() if v is not None}
    exact = {k: v for k, v in exact.items() if v is not None}
    if not ev.downstream:
        return "not testable", "no downstream score differs between cells", []
    if not approx or not exact:
        return "not testable", "needs approximate-attention and exact fine-tuned cells with downstream scores", []
    best_approx = max(approx, key=approx.get)
    median_exact = stats.median(list(exact.values()))
    text = (f"mean downstream score: best approximate {best_approx} {fmt_pct(approx[best_approx])}, "
            f"median of {len(exact)} exact fine-tuned cells {fmt_pct(median_exact)}")
    return ("supported" if approx[best_approx] < median_exact else "not supported"), text, [*approx, *exact]


def rule_finetuned_within_not_beyond(ev: Evidence, corr):
    cells = ev.of(lambda c: c["family"] == "exact" and c["regime"] == "finetuned")
    ratios = {c["cell_id"]: r for c in cells if (r := _ratio_beyond(ev, c))}
    base = ev.ppl_at  # perplexity of the unmodified base at each cell's training length
    within = {c["cell_id"]: (ev.ppl.get((c["cell_id"], c["train_len"])), base(c["train_len"]).get(ev.base_cell))
              for c in cells if c["cell_id"] in ratios}
    if not ratios or ev.base_cell is None:
        return "not testable", "needs the base cell and exact fine-tuned cells evaluated past their training length", []
    better_within = sum(1 for own, b in within.values() if own is not None and b is not None and own < b)
    rising = sorted(r for r, _ in ratios.values())
    median = stats.median(rising)
    text = (f"{better_within} of {len(within)} cells beat the base at their training length; one evaluated length "
            f"beyond it, perplexity is {rising[0]:.2f}× to {rising[-1]:.2f}× (median {median:.2f}×) its value "
            f"at the training length (the rule: every cell beats the base there, and the median rise exceeds "
            f"{ev.thresholds['extrapolation_hard']:g}×)")
    ok = better_within == len(within) and median > ev.thresholds["extrapolation_hard"]
    return ("supported" if ok else "not supported"), text, [*ratios, ev.base_cell]


def rule_dynamic_ntk_best(ev: Evidence, corr):
    tuned = ev.of(lambda c: c["regime"] == "finetuned")
    if not any(c["rope"] == "dynamic_ntk" for c in tuned) or len(tuned) < 2:
        return "not testable", "needs a fine-tuned Dynamic NTK cell and other fine-tuned cells", []
    ids = {c["cell_id"] for c in tuned}
    rope_of = {c["cell_id"]: c["rope"] for c in tuned}
    at_longest = {c: v for c, v in ev.ppl_at(ev.longest).items() if c in ids}
    wins, parts = 0, []
    criteria = [(f"perplexity at {fmt_len(ev.longest)}" if ev.longest else "perplexity", at_longest, min)]
    criteria += [(name, {c: v for c, v in m.items() if c in ids}, max) for name, m in ev.downstream.items()]
    for name, values, pick in criteria:
        if not values:
            continue
        best = pick(values, key=values.get)
        wins += rope_of[best] == "dynamic_ntk"
        parts.append(f"{name}: best {best}")
    if not parts:
        return "not testable", "no scores for the fine-tuned cells", []
    return ("supported" if wins > len(parts) / 2 else "not supported"), \
        f"Dynamic NTK best on {wins} of {len(parts)} criteria ({'; '.join(parts)})", sorted(ids)


def rule_short_range_cost(ev: Evidence, corr):
    if ev.base_cell is None or not ev.ppl:
        return "not testable", "needs the base cell's perplexity", []
    shortest = min(length for _, length in ev.ppl)
    at = ev.ppl_at(shortest)
    tuned = {c["cell_id"]: at[c["cell_id"]] for c in ev.of(lambda c: c["regime"] == "finetuned") if c["cell_id"] in at}
    if ev.base_cell not in at or not tuned:
        return "not testable", f"needs base and fine-tuned perplexity at {fmt_len(shortest)}", []
    worse = sum(v > at[ev.base_cell] for v in tuned.values())
    text = (f"at {fmt_len(shortest)} tokens the base reaches {fmt_num(at[ev.base_cell])}; {worse} of {len(tuned)} "
            f"fine-tuned cells are worse ({fmt_num(min(tuned.values()))} to {fmt_num(max(tuned.values()))})")
    return ("supported" if worse > len(tuned) / 2 else "not supported"), text, [ev.base_cell, *tuned]


RULES = {"ppl_tracks_downstream": rule_ppl_tracks_downstream,
         "approximate_underperforms": rule_approximate_underperforms,
         "finetuned_within_not_beyond": rule_finetuned_within_not_beyond,
         "dynamic_ntk_best": rule_dynamic_ntk_best, "short_range_cost": rule_short_range_cost}


def claims_scoreboard(ev: Evidence, corr: list[dict], paper: dict) -> list[dict]:
    out = []
    for claim in paper["claims"]:
        rule = claim.get("rule")
        if rule is None:
            verdict, ours, cited = "not testable", claim["untestable"], []
        elif rule not in RULES:
            raise ValueError(f"paper.yaml: claim {claim['id']} names unknown rule {rule!r} (known: {', '.join(RULES)})")
        else:
            verdict, ours, cited = RULES[rule](ev, corr)
        out.append({**claim, "verdict": verdict, "ours": ours, "cells": cited,
                    "verdict_class": verdict.replace(" ", "-")})
    return out


def findings(ev: Evidence, corr: list[dict], claims: list[dict], retrieval: dict, seeds: dict | None = None) -> list[dict]:
    """4-6 statements read off the numbers, each with the cells it rests on (rules in this function). Where cells have
    several seeds, `ev` holds their seed means and `seeds` (workflow.report.seeds.seed_summary) their spread."""
    out = []
    at_longest = ev.ppl_at(ev.longest)
    if at_longest:
        best = min(at_longest.values())
        winners = [c for c, v in at_longest.items() if v == best]
        text = (f"At the longest evaluation length ({fmt_len(ev.longest)} tokens) the lowest perplexity is "
                f"{fmt_num(best)}, reached by {', '.join(winners)}")
        cited = list(winners)
        if ev.base_cell in at_longest and ev.base_cell not in winners:
            text += (f"; the unmodified base model reaches {fmt_num(at_longest[ev.base_cell])} "
                     f"({fmt_num(at_longest[ev.base_cell] / best)}× higher)")
            cited.append(ev.base_cell)
        out.append({"text": text + ".", "cells": cited})
    if seeds and seeds["relative_range"]:
        rel = seeds["relative_range"]
        lo, hi = min(rel, key=rel.get), max(rel, key=rel.get)
        ns = seeds["seeds"]
        runs = str(ns[0]) if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"
        text = (f"Between seeds ({runs} runs a cell), perplexity at {fmt_len(seeds['longest'])} tokens varies by "
                f"{100 * rel[lo]:.1f}% ({lo}) to {100 * rel[hi]:.1f}% ({hi}) of the cell's mean (max − min)")
        if seeds["pairs"]:
            text += (f"; {seeds['differ']} of {seeds['pairs']} pairs of methods fine-tuned at the same length differ "
                     f"there beyond the run-to-run spread (paired 95% t-interval over seeds excluding 0)")
        out.append({"text": text + ". The other findings rest on the seed means.", "cells": sorted({lo, hi})})
    ratios = {c["cell_id"]: r for c in ev.of(lambda c: c["regime"] == "finetuned") if (r := _ratio_beyond(ev, c))}
    if ratios:
        lo, hi = min(ratios, key=lambda k: ratios[k][0]), max(ratios, key=lambda k: ratios[k][0])
        out.append({"text": f"One evaluated length beyond their training length, fine-tuned cells reach "
                            f"{ratios[lo][0]:.2f}× ({lo}) to {ratios[hi][0]:.2f}× ({hi}) their perplexity at the "
                            f"training length.", "cells": [lo, hi]})
    flat = {task: info["means"] for task, info in retrieval.items() if info["means"] and task not in ev.downstream}
    if flat:
        out.append({"text": "Retrieval does not separate the methods here: every cell has the same mean accuracy on "
                            + ", ".join(f"{task} ({fmt_pct(next(iter(m.values())))})" for task, m in flat.items())
                            + " over all lengths and depths.",
                    "cells": sorted({c for m in flat.values() for c in m})})
    for task in ev.downstream:
        if task in retrieval:
            means = ev.downstream[task]
            best_id, worst_id = max(means, key=means.get), min(means, key=means.get)
            out.append({"text": f"Mean {task} accuracy over all lengths and depths ranges from "
                                f"{fmt_pct(means[worst_id])} ({worst_id}) to {fmt_pct(means[best_id])} ({best_id}).",
                        "cells": [worst_id, best_id]})
            break  # one retrieval finding; the tables show the rest
    usable = [c for c in corr if c["tau"] is not None and c["p"] is not None]
    if usable:
        alpha = ev.thresholds["significance"]
        sig = [c for c in usable if c["p"] < alpha]
        text = (f"Rank correlation between perplexity at {fmt_len(ev.longest)} and downstream scores across cells: "
                + "; ".join(f"{c['score']} τ = {c['tau']:+.2f} (p = {c['p']:.3f}, {c['n']} cells)" for c in usable)
                + (". " + (f"Significant (p < {alpha:g}) for " + ", ".join(c["score"] for c in sig) if sig
                           else f"None is significant at p < {alpha:g}, so this study cannot confirm that perplexity "
                                "ranks downstream performance") + "."))
        out.append({"text": text, "cells": sorted({x for c in usable for x in c["cells"]})})
    against = [c for c in claims if c["verdict"] == "not supported"]
    if against:
        out.append({"text": "The data contradict the reference study on: " + "; ".join(
            f"claim {c['id']} ({c['claim'].rstrip('.')}: {c['ours']})" for c in against) + ".",
            "cells": sorted({x for c in against for x in c["cells"]})})
    absent = [c for c in ev.cells if not c["ok"]]
    if absent:
        several = len(absent) > 1
        out.insert(0, {"text": f"{len(absent)} expected cell{'s are' if several else ' is'} not reported "
                               f"because {'they have' if several else 'it has'} no results: " + ", ".join(f"{c['cell_id']} ({c['status_text']})"
                                                                       for c in absent) + ".",
                       "cells": [c["cell_id"] for c in absent]})
    return out[:6]

