"""HTTP API v1: one blueprint per resource; views parse, call the domain, shape the reply."""
