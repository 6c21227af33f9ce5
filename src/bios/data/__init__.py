"""Turning data (chat conversations, prompt/completion pairs) into `Datum`s."""
