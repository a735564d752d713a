"""The command line: `main` (the `eigenwatch` parser and its commands),
`serve` (vLLM's OpenAI server with the tap plus the sidecar), `demo`, `shield`
(EigenShield fit and eval), and `processes` (the child processes they start)."""
