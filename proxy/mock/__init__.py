"""The OpenAI-compatible fake upstream for the demo, the tests and the benchmarks.

`content` is its pure part (deterministic answers and their SSE bytes); `upstream` serves
them over real HTTP with knobs for delays, resets and quirks.
"""
