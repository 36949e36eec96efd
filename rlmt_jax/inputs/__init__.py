"""What a run reads: prompts and SFT conversations (datasets, the seeded and sharded batch iterator), chat
and zero templates (how a prompt is rendered, how an output splits into plan and answer), and the built-in
tiny models and tokenizer."""
