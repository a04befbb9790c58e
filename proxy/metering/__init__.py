"""Metering: what each request used and cost (pure, no I/O).

- `reported`: usage the upstream reported (JSON usage object, response headers);
- `scan`: finds the usage event in relayed SSE bytes without parsing the rest;
- `estimate`: offline token counts when an upstream reports none;
- `cost`: USD from usage and a configured price;
- `tee`: the relay's per-chunk observer (watch / drop / collect);
- `usage`: which tee a request needs, and where its usage finally comes from.
"""
