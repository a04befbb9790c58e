"""Metering: what each request used and cost (pure, no I/O).

- `reported`: usage the upstream reported (JSON usage object, response headers);
- `scan`: the tee's stream readers: the usage-event finder (no parsing but of that event),
  the usage-event dropper and the text collector;
- `estimate`: offline token counts when an upstream reports none, and the one rule for
  which text of a message counts (`message_texts`, `choice_texts`);
- `cost`: USD from usage and a configured price;
- `tee`: the relay's per-chunk observer, one strategy per behaviour (`Watch`, `Drop`,
  `Collect`, `CollectAddingUsage`);
- `usage`: which tee a request needs, and where its usage finally comes from.
"""
