"""X-ELM: multilingual forests (language groups as experts, languages added later)."""
