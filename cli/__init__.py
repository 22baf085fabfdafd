"""The `nvae` command: `main` dispatches to one module per command group (`data`, `train`, `inference`,
`serve`, `pipeline`, `store`, `model`). Each `cmd_*` parses its arguments, calls one library function and
prints its result; `main` turns the product's errors into one line and exit status 2."""
