"""The search service in three rooms, arrows one way: `rules` (what a study decides),
`training` (what runs trials; imports the rules) and `commands` (what a user types and sees;
imports both), with the `hpo` CLI (cli.py) on top."""
