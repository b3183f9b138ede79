"""The terminal chat: REPL, slash commands, rendering and the conversation store."""
