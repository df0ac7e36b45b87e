from jcompress.cli import console

console()
