"""The cluster performance model (perfmodel), its inputs (cluster, kernel rates) and the
CPU/MPI calibration. Imports the library below it; nothing imports it but commands.
"""
