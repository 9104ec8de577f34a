"""What a bench run concludes: speedups, the HBM roofline at ar bs=1, the separate-GPU
projection, the printed tables."""
from pearl_runtime.engine.step_timer import VerifyCost
from pearl_runtime.bench import projection, roofline
from pearl_runtime.bench.near_ties import same_text

ORDER = ("ar", "sd", "pearl", "auto")   # rows of a batch size, in this order


def add_speedups(rows: list[dict], greedy: bool = True) -> None:
    """speedup over ar at the same batch size (a wall-clock ratio: every mode generated the
    same tokens) and whether greedy outputs equal ar's."""
    ar = {r["batch_size"]: r for r in rows if r["mode"] == "ar"}
    for r in rows:
        base = ar.get(r["batch_size"])
        r["speedup_vs_ar"] = base["wall_s"] / r["wall_s"] if base else None
        dec, dec_ar = r.get("decode_tokens_per_s"), base and base.get("decode_tokens_per_s")
        r["decode_speedup_vs_ar"] = dec / dec_ar if dec and dec_ar else None
        full, full_ar = r.get("full_batch_tokens_per_s"), base and base.get("full_batch_tokens_per_s")
        r["full_batch_speedup_vs_ar"] = full / full_ar if full and full_ar else None
        r["outputs_match_ar"] = base["outputs_sha256"] == r["outputs_sha256"] if base and greedy else None
        if r["outputs_match_ar"] is False and "_outputs" in base and "_outputs" in r and "divergence" not in r:
            r["divergence"] = divergence(base["_outputs"], r["_outputs"])


def divergence(ref: list[list[int]], got: list[list[int]]) -> dict:
    """Where greedy outputs part from ar's: how many requests differ, and the first differing
    token of each (request, index, ar's token, the mode's), for near_ties to judge (bf16
    near-ties flip a token, then the continuations differ)."""
    firsts = []
    for r, (x, y) in enumerate(zip(ref, got)):
        if x != y:
            i = next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
            if i < min(len(x), len(y)):
                firsts.append({"request": r, "index": i, "ar_token": x[i], "token": y[i]})
            else:
                firsts.append({"request": r, "index": i})
    return {"requests": len(ref), "differing": len(firsts), "first_index": sorted(f["index"] for f in firsts),
            "firsts": firsts}


def public(rows: list[dict]) -> list[dict]:
    """Rows for the JSON: without the raw outputs."""
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]


def hbm(rows: list[dict], target_dir: str, dtype: str, prompt_len: int, probe: dict,
        gpus: int = 1) -> dict | None:
    """Achieved HBM bandwidth of ar at bs=1 (and of the HF baseline) against the measured copy
    bandwidth of one GPU. Step time = wall / max_tokens (prefill and host work included);
    forward-only uses the target's forward time per round instead. A TP target of `gpus`
    ranks reads about 1/gpus of the bytes on each GPU, so its figures are per GPU."""
    ar1 = next((r for r in rows if r["mode"] == "ar" and r["batch_size"] == 1), None)
    if ar1 is None:
        return None
    n = ar1["max_tokens"]
    b = roofline.decode_step_bytes(target_dir, dtype, mean_context=prompt_len + n / 2)
    b = {**b, "total_bytes": b["total_bytes"] / gpus, "weight_bytes": b["weight_bytes"] / gpus,
         "kv_bytes": b["kv_bytes"] / gpus, "target_gpus": gpus}
    # a bs=1 row may run several batches one after another (--min-seqs): its wall covers them all
    step_ms = ar1["wall_s"] / (n * ar1.get("batches", 1)) * 1e3
    copy = probe.get("copy", {}).get("gbps")
    out = {**b, "step_ms": step_ms, "achieved_gbps": roofline.achieved_gbps(b["total_bytes"], step_ms),
           "forward_ms": ar1["target_ms"],
           "forward_only_gbps": roofline.achieved_gbps(b["total_bytes"], ar1["target_ms"]),
           "copy_gbps": copy, "prompt_tokens": prompt_len}
    out["fraction_of_copy"] = out["achieved_gbps"] / copy if copy and out["achieved_gbps"] else None
    hf = probe.get("hf_baseline")
    if hf:
        hb = roofline.decode_step_bytes(target_dir, dtype, mean_context=hf["prompt_tokens"] + hf["tokens"] / 2)
        out["hf_baseline"] = {**hf, "achieved_gbps": roofline.achieved_gbps(hb["total_bytes"], hf["step_ms"]),
                              "fraction_of_copy": (roofline.achieved_gbps(hb["total_bytes"], hf["step_ms"]) / copy
                                                   if copy else None)}
    return out


def project(rows: list[dict], same_gpu: bool, head_start: int = -1,
            quorum: float = projection.HEAD_START_QUORUM) -> list[dict]:
    """Per batch size: the round model's PEARL speedup with draft and target on their own
    GPUs (see projection.py). Inputs come from the sd run where there is one (there draft and
    target run one after the other, so their times are uncontended even on one GPU), else
    from the pearl run (contended if they shared a GPU). `quorum`: the target's
    --head-start-quorum, for the batch simulation."""
    by = {(r["mode"], r["batch_size"]): r for r in rows}
    out = []
    for bs in sorted({r["batch_size"] for r in rows}):
        ar, src = by.get(("ar", bs)), by.get(("sd", bs)) or by.get(("pearl", bs))
        if ar is None or src is None or not src["gamma"] or src["accept_rate"] is None:
            continue
        g = src["gamma"]
        t_d, t_v = src["draft_ms"] / g, src["target_ms"]
        if src["mode"] == "sd":
            t_x = src["round_ms"] - src["target_ms"] - src["draft_ms"]     # host + transport
        else:
            t_x = src["host_ms"]                                           # transport hidden
        w = projection.head_start_for(g, head_start)   # the target's head start at this gamma
        alpha = projection.fit_alpha(src["accept_rate"], g, src["mode"], w if src["mode"] == "pearl" else 0)
        pearl = by.get(("pearl", bs))
        # how often the pearl run's rounds waited for a head start (the target grants it to the
        # whole batch when most of it is in pre-verify: rarely at large batch)
        pm = pearl["metrics_diff"] if pearl else {}
        share = (pm["head_start_rounds"] / pm["speculative_rounds"]
                 if pm.get("speculative_rounds") and "head_start_rounds" in pm else None)
        p = projection.project(ar["round_ms"], t_d, t_v, t_x, alpha, g, w, share)
        # with the target's table of verify times by query length (at batch 32 on 72B: 45 ms at
        # 8 tokens, 75 at 16), a verify of another query is the measured one scaled by it, from
        # the query t_v was measured at: sd feeds gamma + 1 a sequence, a pearl batch a mix of 1
        # (pre-verify) and gamma (post-verify) that the run's judged counts give
        cost = VerifyCost.from_rows(src["metrics_diff"].get("verify_times") or [])
        ref_q = _measured_query(src, g)
        ref_ms = cost.ms(bs, ref_q, True) if cost.table else None
        # other gammas: at the query PEARL feeds at that gamma (its chain's mean, pre-verify
        # rounds with their head start)
        at = ((lambda x: t_v * cost.ms(bs, projection.pearl_mean_query(
            alpha, x, projection.head_start_for(x, head_start)), True) / ref_ms) if ref_ms else t_v)
        gammas = range(1, max(cost.table) if cost.table else 17)
        best_g, best = projection.best_gamma(ar["round_ms"], t_d, at, t_x, alpha, gammas, head_start=head_start)
        sd = by.get(("sd", bs))
        pg = pearl["gamma"] if pearl and pearl["gamma"] else g   # pearl may run its own gamma
        wp = projection.head_start_for(pg, head_start)
        mat_model = projection.project(ar["round_ms"], t_d, t_v, t_x, alpha, pg, wp, share)["pearl_tokens_per_round"]
        # the batch rules round by round at pearl's gamma: a head start holds the whole batch,
        # which the closed form (one sequence) leaves out; the verify at the batch's mean query
        q_ms = (lambda q: t_v * cost.ms(bs, q, True) / ref_ms) if ref_ms else (lambda q: t_v)
        batch_sim = ar["round_ms"] * projection.simulate_pearl_batch(alpha, pg, wp, bs, t_d, q_ms, t_x, quorum,
                                                                     rounds=max(2000, 40_000 // bs))
        out.append({
            "batch_size": bs, "source": src["mode"], "contended": src["mode"] == "pearl" and same_gpu,
            "gamma": g, "alpha": alpha, "t_ar_ms": ar["round_ms"], "t_d_ms": t_d, "t_v_ms": t_v, "t_x_ms": t_x,
            **p,
            # checks of the model against this run: sd's wall-clock speedup; PEARL's tokens per
            # round at alpha (fitted to sd's acceptance, or to pearl's own without an sd run)
            "sd_speedup_measured": sd["speedup_vs_ar"] if sd else None,
            "head_start": w, "head_start_share": share, "pearl_mat_model": mat_model,
            "pearl_mat_measured": pearl["mat"] if pearl else None,
            "best_gamma": best_g, "pearl_speedup_best_gamma": best, "pearl_speedup_batch_sim": batch_sim,
        })
    return out


def _measured_query(src: dict, gamma: int) -> float:
    """Tokens a sequence fed the row's measured verify: gamma + 1 in sd; in pearl the run's
    mean over its sequence-rounds (pre-verify ones feed 1), gamma + 1 if it has no counts."""
    mean = projection.mean_judged(src["metrics_diff"].get("judged_runs") or []) if src["mode"] == "pearl" else None
    return mean or gamma + 1


def _f(x, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def _pct(x):
    return None if x is None else 100 * x


def table(rows: list[dict]) -> str:
    head = (f"{'mode':<6}{'bs':>4}{'tok/s':>10}{'speedup':>9}{'MAT':>6}{'accept':>8}{'round':>8}{'draft':>8}"
            f"{'target':>8}{'wait':>8}{'host':>8}{'xfer':>8}{'xfer%':>7}{'ttft':>8}{'dec tok/s':>11}{'dec x':>7}"
            f"{'full x':>8}  same")
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: (r["batch_size"], ORDER.index(r["mode"]))):
        # "NO 2/16@37": 2 of 16 requests differ past the near-tie bound, the earliest at token 37
        same = same_text(r.get("divergence"), r.get("outputs_match_ar"))
        lines.append(f"{r['mode']:<6}{r['batch_size']:>4}{r['tokens_per_s']:>10.1f}{_f(r.get('speedup_vs_ar')):>9}"
                     f"{_f(r['mat']):>6}{_f(r['accept_rate']):>8}{r['round_ms']:>8.2f}{r['draft_ms']:>8.2f}"
                     f"{r['target_ms']:>8.2f}{r['wait_ms']:>8.2f}{r['host_ms']:>8.2f}{_f(r['xfer_ms']):>8}"
                     f"{_f(_pct(r.get('xfer_share')), '.1f'):>7}{r['ttft_ms']['mean']:>8.1f}{_f(r.get('decode_tokens_per_s'), '.1f'):>11}"
                     f"{_f(r.get('decode_speedup_vs_ar')):>7}{_f(r.get('full_batch_speedup_vs_ar')):>8}  {same}")
    lines.append("times in ms per round (one batched target forward); speedup = ar wall / wall at the same bs; "
                 "dec: the rate once every request is decoding (first tokens left out); "
                 "full x: the rate while every request of the batch is decoding (until the first one ends), over ar's; "
                 "xfer = draft round trip minus the draft's own time (overlapped with the forward in pearl), "
                 "xfer% of the round; same = greedy outputs identical to ar, or near-tie k/n: k requests "
                 "part from ar where ar's and the mode's tokens were within the dtype's near-tie bound "
                 "(bench/near_ties.py), NO past it")
    if any(r.get("metrics_diff", {}).get("device_token_rounds") for r in rows if r["mode"] == "sd"):
        lines.append("sd with draft tokens left on the device: draft is the draft's device time, xfer the two "
                     "hops (out + back), host the rest of the round (host work and the GPU's idle gaps)")
    return "\n".join(lines)


def divergence_text(rows: list[dict]) -> list[str]:
    """Each divergence's first differing token: its index and the target's logit gap there."""
    lines = []
    for r in sorted(rows, key=lambda r: (r["batch_size"], ORDER.index(r["mode"]))):
        for f in (r.get("divergence") or {}).get("firsts", []):
            j = f.get("judged")
            what = "unjudged" if j is None else (f"gap {j['gap']:.4g} (top-2 {j['top2_gap']:.4g}) vs bound "
                                                f"{j['bound']:.4g}: {'near-tie' if j['near_tie'] else 'NO'}")
            lines.append(f"  {r['mode']:<6}{r['batch_size']:>4}  request {f['request']} token {f['index']}: {what}")
    if lines:
        lines.insert(0, "first differing tokens against ar (the target's logits of ar's token and the mode's "
                        "there; a near-tie is a gap within the bound):")
    return lines


def auto_choice_text(rows: list[dict]) -> list[str]:
    """What --mode auto ran at each batch size: its requests' round paths (a request's path
    reads sd+ar when it met both) and how many requests took each."""
    picks = [f"bs {r['batch_size']}: " + ", ".join(f"{p} x{n}" for p, n in sorted(r["paths"].items()))
             for r in sorted(rows, key=lambda r: r["batch_size"]) if r["mode"] == "auto" and r.get("paths")]
    return ["auto chose (round paths of its requests): " + "; ".join(picks)] if picks else []


def acceptance_text(rows: list[dict], positions: int = 12, min_reached: int = 4) -> list[str]:
    """Acceptance by draft position for each speculative row (positions reached by fewer than
    `min_reached` sequence-rounds are left out): under the round model's independent
    acceptance the numbers would all read alpha."""
    lines = []
    for r in sorted(rows, key=lambda r: (r["batch_size"], ORDER.index(r["mode"]))):
        prof = [(a, n) for a, n in (r.get("accept_by_position") or [])[:positions] if n >= min_reached]
        if r["mode"] != "ar" and prof:
            lines.append(f"  {r['mode']:<6}{r['batch_size']:>4}  " + " ".join(f"{a:.2f}" for a, _ in prof)
                         + f"   (reached by {prof[0][1]} .. {prof[-1][1]})")
    if lines:
        lines.insert(0, "acceptance by draft position (share of sequence-rounds that reached position k and "
                        "accepted it; independent acceptance reads alpha throughout):")
    return lines


def transport_text(rows: list[dict]) -> list[str]:
    """Each speculative row's xfer in its two hops (round out to the draft, batch back) and
    the rest (inside the draft's process, outside its own reported time)."""
    lines = [f"  {r['mode']:<6}{r['batch_size']:>4}  out {r['xfer_out_ms']:.3f}  back {r['xfer_back_ms']:.3f}  "
             f"rest {r['xfer_ms'] - r['xfer_out_ms'] - r['xfer_back_ms']:.3f}"
             for r in sorted(rows, key=lambda r: (r["batch_size"], ORDER.index(r["mode"])))
             if r["mode"] != "ar" and r.get("xfer_out_ms") is not None]
    if lines:
        lines.insert(0, "xfer by hop, ms a round (the draft's stamps on this host's monotonic clock): out = "
                        "round written -> off the draft's stream, back = batch handed to the draft's stream -> "
                        "read, rest = xfer - out - back")
    return lines


SLOW_START = 4.0   # a speculative row's first tokens this many times later than ar's...
SLOW_START_MS = 100.0   # ...and at least this late are called out


def start_notes(rows: list[dict]) -> list[str]:
    """Rows whose first tokens came far later than ar's at the same batch size: a first round
    that stalled (an eager step of a new shape compiling its kernels, seen at 600-750 ms) weighs
    on a short run's tokens/s; the dec columns leave it out."""
    ar = {r["batch_size"]: r["ttft_ms"]["mean"] for r in rows if r["mode"] == "ar"}
    notes = []
    for r in rows:
        base, ttft = ar.get(r["batch_size"]), r["ttft_ms"]["mean"]
        if r["mode"] != "ar" and base and ttft > SLOW_START * base and ttft > SLOW_START_MS:
            notes.append(f"slow start: {r['mode']} bs={r['batch_size']} first tokens after {ttft:.0f} ms against "
                         f"ar's {base:.0f} ms; look for 'eager step outside the graph buckets' in its service logs")
    return notes


def hbm_text(h: dict | None) -> str:
    if not h:
        return "HBM: no ar bs=1 row"
    gb = lambda x: _f(x, ".4g")   # noqa: E731
    per = f" per GPU of {h['target_gpus']}" if h.get("target_gpus", 1) > 1 else ""
    lines = [f"HBM at ar bs=1{per}: {h['total_bytes'] / 1e9:.3g} GB a step (weights {h['weight_bytes'] / 1e9:.3g} GB with "
             f"the full LM head and one embedding row, KV {h['kv_bytes'] / 1e9:.3g} GB at mean context "
             f"{h['mean_context']:.0f})",
             f"  pearl-serve  {h['step_ms']:.2f} ms/token -> {gb(h['achieved_gbps'])} GB/s "
             f"({_f(h['fraction_of_copy'] and 100 * h['fraction_of_copy'], '.0f')}% of copy); forward only "
             f"{h['forward_ms']:.2f} ms -> {gb(h['forward_only_gbps'])} GB/s"]
    if h.get("hf_baseline"):
        b = h["hf_baseline"]
        lines.append(f"  HF generate  {b['step_ms']:.2f} ms/token -> {gb(b['achieved_gbps'])} GB/s, "
                     f"{b['tokens_per_s']:.1f} tokens/s ({b['weights']})")
    lines.append(f"  device copy bandwidth (read + write, best of several): {gb(h['copy_gbps'])} GB/s")
    return "\n".join(lines)


def projection_text(proj: list[dict]) -> str:
    if not proj:
        return "projection: needs ar and sd (or pearl) runs"
    head = (f"{'bs':>4}{'src':>6}{'gamma':>6}{'w':>3}{'hs%':>5}{'alpha':>7}{'t_ar':>8}{'t_d':>8}{'t_v':>8}{'t_x':>8}"
            f"{'sd x':>7}{'sd meas':>8}{'MAT mod':>8}{'MAT meas':>9}{'PEARL x':>9}{'best g':>7}{'at best':>8}"
            f"{'batch x':>8}")
    lines = ["PROJECTED PEARL speedup over ar with draft and target on separate GPUs (round model, "
             "benchmarks/README.md); ms", head]
    for p in proj:
        hs = p.get("head_start_share")
        lines.append(f"{p['batch_size']:>4}{p['source']:>6}{p['gamma']:>6}{p['head_start']:>3}"
                     f"{_f(hs if hs is None else 100 * hs, '.0f'):>5}{p['alpha']:>7.3f}"
                     f"{p['t_ar_ms']:>8.2f}"
                     f"{p['t_d_ms']:>8.2f}{p['t_v_ms']:>8.2f}{p['t_x_ms']:>8.2f}{_f(p['sd_speedup']):>7}"
                     f"{_f(p['sd_speedup_measured']):>8}{_f(p['pearl_mat_model']):>8}{_f(p['pearl_mat_measured']):>9}"
                     f"{_f(p['pearl_speedup']):>9}{p['best_gamma']:>7}"
                     f"{_f(p['pearl_speedup_best_gamma']):>8}{_f(p.get('pearl_speedup_batch_sim')):>8}"
                     + ("  (contended inputs)" if p["contended"] else ""))
    lines.append("w: PEARL's head start (draft tokens waited for in pre-verify); hs%: share of the pearl run's "
                 "rounds that waited for it (the model uses it: pre-verify rounds without it judge 1 token; "
                 "'best g' assumes every pre-verify round gets it); sd x / PEARL x: model speedups "
                 "over ar; sd meas: measured sd wall-clock speedup; MAT mod / meas: PEARL tokens per "
                 "sequence-round, model at alpha vs measured; batch x: PEARL x by playing the target's batch "
                 "rules round by round (a head start holds the whole batch; projection.simulate_pearl_batch)")
    return "\n".join(lines)
