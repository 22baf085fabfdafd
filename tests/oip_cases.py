"""Open Inference Protocol v2 request bodies shared by the tests of both servers (built-in and KServe):
a valid one, and every malformed or out-of-range case that must be answered 400."""


def body(n=3, temperature=0.8, seed=7, **extra):
    inputs = [
        {"name": "n", "datatype": "INT64", "shape": [1], "data": [n]},
        {"name": "temperature", "datatype": "FP32", "shape": [1], "data": [temperature]},
    ]
    if seed is not None:
        inputs.append({"name": "seed", "datatype": "INT64", "shape": [1], "data": [seed]})
    return {"inputs": inputs, **extra}


def _with(name, **change):
    b = body()
    for inp in b["inputs"]:
        if inp["name"] == name:
            inp.update(change)
    return b


BAD = {
    "not json": b"{not json",
    "json array": b"[1, 2]",
    "no inputs": {"inputs": []},
    "missing n": {"inputs": body()["inputs"][1:]},
    "n zero": _with("n", data=[0]),
    "n negative": _with("n", data=[-4]),
    "n above limit": _with("n", data=[33]),
    "n float": _with("n", data=[2.5]),
    "n string": _with("n", data=["3"]),
    "n bool": _with("n", data=[True]),
    "n two values": _with("n", data=[1, 2], shape=[2]),
    "n wrong datatype": _with("n", datatype="FP32"),
    "n bad shape": _with("n", shape="1"),
    "temperature zero": _with("temperature", data=[0.0]),
    "temperature negative": _with("temperature", data=[-1.0]),
    "temperature huge": _with("temperature", data=[1e30]),
    "temperature NaN": b'{"inputs": [{"name": "n", "datatype": "INT64", "shape": [1], "data": [1]},'
    b'{"name": "temperature", "datatype": "FP32", "shape": [1], "data": [NaN]}]}',
    "temperature Infinity": b'{"inputs": [{"name": "n", "datatype": "INT64", "shape": [1], "data": [1]},'
    b'{"name": "temperature", "datatype": "FP32", "shape": [1], "data": [Infinity]}]}',
    "seed negative": _with("seed", data=[-1]),
    "seed above int64": _with("seed", data=[2**64]),
    "unknown input": {
        "inputs": body()["inputs"] + [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]
    },
    "duplicate input": {"inputs": body()["inputs"] + body()["inputs"][:1]},
    "shape [-1, -1]": _with("n", shape=[-1, -1]),
    "shape [0]": _with("n", shape=[0]),
    "5000-digit integer": b'{"inputs": [{"name": "n", "datatype": "INT64", "shape": [1], "data": ['
    + b"9" * 5000
    + b"]}]}",
    "5000-deep array": b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    "5000-deep object": b'{"a": ' * 5000 + b"1" + b"}" * 5000,
    "invalid utf-8": b'{"inputs": "\xff\xfe"}',
    "unknown format": body(parameters={"format": "jpeg"}),
    "unknown output": body(outputs=[{"name": "logits"}]),
}
