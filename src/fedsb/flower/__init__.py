"""Flower apps for fedsb: the only package that imports `flwr`.

- `client_app:app`: a SuperNode trains its partition (`--node-config partition-id=K`) with the
  in-process engine's own client code.
- `server_app:app`: the round loop with timeouts, quorum, update screening, checkpoints, and
  optional SecAgg+.
- `launch`: start a SuperLink and N SuperNodes on loopback (insecure, or TLS + SuperNode
  authentication), run a federation, stop everything.

Imports stay lazy here so that `import fedsb.flower` costs nothing.
"""
