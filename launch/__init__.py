# The commands (train, evaluate, convert, prepare_data, plan): run as `python launch/NAME.py` from a checkout, or as
# the facecl-NAME console scripts of an installed wheel, where this folder is the package toolkit.launch.
