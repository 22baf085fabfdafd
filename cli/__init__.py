"""The `nvae` command: `main` dispatches to one module per command group (`data`, `train`, `inference`,
`serve`, `pipeline`), each a few lines of argument parsing over the library packages."""
