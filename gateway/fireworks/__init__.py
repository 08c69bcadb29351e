"""The Fireworks inference APIs.

One layout rule: a module named after an API (`chat`, `completions`, `embeddings`, `rerank`,
`responses`) holds that API's object, its translation (pure, returning the worker body and
whatever else it decides) and, where no other API shares it, its Call. Every other module is
shared by several APIs and named for what it holds:

- `protocol`: the request models and helpers over them;
- `sampling`: the generation APIs' shared translation (sampling fields, cache salt,
  reasoning, structured output, logprobs) and the Plan;
- `generation`: the Call that chat and completions share (checks and lookups on the worker,
  the answer reshaped), around the pure `plain` (a whole answer) and `stream` (chunks),
  with `choices` (one choice), `perf` (the fireworks-* metrics) and `worker_answer` (what a
  valid worker answer is).
"""
