"""Every `trb-nemo` subcommand and the pre-start checks; :mod:`trb_nemo.cli` parses and
dispatches here."""
