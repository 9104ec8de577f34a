"""The tritonclient side of test_kserve.py, run as its own program (holds no tests).

tritonclient carries its own copy of the inference protos, which cannot share a process with
pearl_runtime.pb's; so this program imports nothing of ours. It prints one JSON object."""
import json
import queue
import sys


def main(address: str, model: str, token: str) -> None:
    import numpy as np
    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException

    headers = {"authorization": f"Bearer {token}"} if token else None
    client = tc.InferenceServerClient(address)
    out = {"live": client.is_server_live(headers=headers), "ready": client.is_server_ready(headers=headers),
           "model_ready": client.is_model_ready(model, headers=headers)}
    meta = client.get_model_metadata(model, headers=headers, as_json=True)
    out["inputs"] = [t["name"] for t in meta["inputs"]]
    out["outputs"] = [t["name"] for t in meta["outputs"]]
    config = client.get_model_config(model, headers=headers, as_json=True)["config"]
    out["decoupled"] = config.get("model_transaction_policy", {}).get("decoupled", False)

    def inputs(prompt: str, stream: bool, sampling: str, exclude: bool = True):
        tensors = []
        for name, dtype, value in (("text_input", "BYTES", np.array([prompt.encode()], dtype=np.object_)),
                                   ("stream", "BOOL", np.array([stream])),
                                   ("sampling_parameters", "BYTES", np.array([sampling.encode()], dtype=np.object_)),
                                   ("exclude_input_in_output", "BOOL", np.array([exclude]))):
            t = tc.InferInput(name, [1], dtype)
            t.set_data_from_numpy(value)
            tensors.append(t)
        return tensors

    greedy = json.dumps({"temperature": 0, "max_tokens": 12})
    result = client.infer(model, inputs("Hello", False, greedy), headers=headers)
    out["infer"] = {"text": result.as_numpy("text_output")[0].decode(),
                    "finish_reason": result.as_numpy("finish_reason")[0].decode(),
                    "num_input_tokens": int(result.as_numpy("num_input_tokens")[0]),
                    "num_output_tokens": int(result.as_numpy("num_output_tokens")[0])}
    with_prompt = client.infer(model, inputs("Hello", False, greedy, exclude=False), headers=headers)
    out["infer_with_prompt"] = with_prompt.as_numpy("text_output")[0].decode()
    try:
        client.infer(model, inputs("Hello", False, json.dumps({"temperature": "hot"})), headers=headers)
        out["infer_bad"] = None
    except InferenceServerException as e:
        out["infer_bad"] = e.message()

    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)), headers=headers)

    def stream(request_id: str, sampling: str) -> dict:
        client.async_stream_infer(model, inputs("Hello", True, sampling), request_id=request_id,
                                  enable_empty_final_response=True)
        chunks = []
        while True:
            result, error = answers.get(timeout=30)
            if error is not None:
                return {"error": str(error)}
            response = result.get_response()
            assert response.id == request_id, (response.id, request_id)
            text = result.as_numpy("text_output")
            if text is not None:
                chunks.append(text[0].decode())
            if response.parameters["triton_final_response"].bool_param:
                return {"chunks": chunks, "final_has_outputs": len(response.outputs) > 0}

    out["stream"] = stream("s1", greedy)
    out["stream_bad"] = stream("bad", json.dumps({"temperature": 0, "top_k": "many"}))
    out["stream_after_bad"] = stream("s2", greedy)
    client.stop_stream()
    client.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:4])
