"""The dgpt command line: one typer sub-app per noun, thin over sdk/ and head/."""
