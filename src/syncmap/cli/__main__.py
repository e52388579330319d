"""``python -m syncmap.cli``: the same as the ``syncmap`` command."""

from . import main

main(prog_name="syncmap")
