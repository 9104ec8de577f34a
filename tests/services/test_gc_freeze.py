"""A started service has frozen its start-up heap, so the collector's full walks during
serving skip the ~200k objects that torch, transformers and grpc leave alive."""


def test_the_draft_freezes_its_start_up_heap(cluster):
    stack = cluster.stack("copy", "pearl")
    stack.draft.wait_log("gc: froze", timeout_s=30)
    line = next(ln for ln in stack.draft.log().splitlines() if "gc: froze" in ln)
    frozen = int(line.split("froze ")[1].split()[0])
    assert frozen > 50_000, line
