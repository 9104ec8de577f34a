"""Whether a greedy divergence from ar is a numerical near-tie: the target's logits at the first
differing token, recomputed in a child process (`python -m pearl_runtime.bench.near_ties`),
and the bound that separates a near-tie from a real divergence.

The bound: the two tokens' logits (ar's pick and the mode's) differ by at most NEAR_TIE_ULPS
units in the last place of the dtype at the top logit's magnitude. The LM head writes its
logits in the run's dtype, so in bf16 (8 significant bits) a logit of 20 is only known to
within 0.125; and a verify of several tokens a sequence or another batch size runs other
kernels (split-K, other tile orders) through every layer, which move the final logits by a
few such units. Within 4 of them the argmax is a coin toss between the two kernels; past it,
one kernel computed something else, which is a bug. In fp32 the unit is 2^-23 of the logit:
only exact ties qualify, as fp32 runs are identical.
"""
import json
import math
import sys

NEAR_TIE_ULPS = 4
MANTISSA_BITS = {"bfloat16": 7, "float16": 10, "float32": 23}


def bound(top_logit: float, dtype: str) -> float:
    """NEAR_TIE_ULPS units in the last place of `dtype` at the magnitude of `top_logit`."""
    exp = math.floor(math.log2(abs(top_logit))) if top_logit else 0
    return NEAR_TIE_ULPS * 2.0 ** (exp - MANTISSA_BITS[dtype])


def judge(logits, ar_token: int, got_token: int, dtype: str) -> dict:
    """One first differing token: the row of the target's logits there (any sequence of
    floats), ar's token and the mode's. Returns the gap between the two, the top-2 gap, the
    bound and whether it is a near-tie."""
    row = [float(x) for x in logits]
    top = sorted(row, reverse=True)[:2]
    gap = abs(row[ar_token] - row[got_token])
    b = bound(top[0], dtype)
    return {"gap": gap, "top2_gap": top[0] - top[1], "bound": b, "near_tie": gap <= b}


def same_text(div: dict | None, match: bool | None) -> str:
    """The table's `same` column: yes, near-tie k/n (every divergence within the bound), or
    NO k/n@i (k divergences past it, the earliest at token i; unjudged ones count as NO)."""
    if match is None:
        return "-"
    if match or not div:
        return "yes"
    firsts = div.get("firsts") or []
    real = [f for f in firsts if not (f.get("judged") or {}).get("near_tie")]
    if firsts and not real:
        return f"near-tie {len(firsts)}/{div['requests']}"
    at = min(f["index"] for f in real) if real else div["first_index"][0]
    return f"NO {len(real) or div['differing']}/{div['requests']}@{at}"


def main(request_path: str, result_path: str) -> None:
    """{"model", "device", "dtype", "queries": [[prefix ids, ar's token, the mode's token], ...]}
    -> {"judged": [judge(...) of each]}: the target's logits after each prefix, in the run's dtype."""
    import torch

    from pearl_runtime.bench.probe import _hf_model
    from pearl_runtime.config import DTYPES
    with open(request_path) as f:
        req = json.load(f)
    dev = torch.device(req["device"])
    model, _ = _hf_model(req["model"], dev, DTYPES[req["dtype"]])
    judged = []
    with torch.inference_mode():
        for prefix, ar_token, got_token in req["queries"]:
            row = model(torch.tensor([prefix], device=dev)).logits[0, -1].float().cpu()
            judged.append(judge(row.tolist(), ar_token, got_token, req["dtype"]))
    with open(result_path, "w") as f:
        json.dump({"judged": judged}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
