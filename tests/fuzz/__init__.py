"""Bad-input fuzzing of a live gateway (issue #4).

Hypothesis builds ModelInferRequests for the example models and a string model
(``lowercase``, BYTES in and out, checked against in-process ONNX Runtime), mostly malformed
(unknown models and versions, wrong datatypes, shapes, byte lengths, huge and
negative dims, BYTES tensors with broken length prefixes or non-UTF-8 elements,
odd parameters (``class_count`` included),
oversized messages) and some valid, and sends each over real gRPC to one mesh
that serves the whole package. An oracle written from the models' declared
inputs, independent of the codec, says which status each request must get:
OK only for a valid request, else RESOURCE_EXHAUSTED, NOT_FOUND or
INVALID_ARGUMENT; DEADLINE_EXCEEDED only when the request asked for a tiny
timeout or the client gave it a tiny deadline. UNKNOWN or INTERNAL is a crash in
our code; no answer within the call's deadline is a hang. Status details stay
short (they quote client-chosen names). Bugs found this way stay as explicit
``@example`` regressions.

- ``oracle``: the models' declared inputs and the status each request must get
- ``harness``: the mesh on its own event loop in a thread, the checks on one call
- ``strategies``: hypothesis strategies for requests, parameters, tensors, datatypes
- ``test_requests``: fuzzed requests against the live gateway
- ``test_codec``: the codec alone over every KServe datatype (no served model has
  narrow integer inputs)
- ``test_memory``: 10 000 deterministic malformed requests; the gateway's memory stays flat
"""
