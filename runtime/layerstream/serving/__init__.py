"""The MLServer side: the runtime, its settings, the V2 request contract and its encoding."""
