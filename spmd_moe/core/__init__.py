"""The ground floor: errors, configuration, topology, the chunk schedule and its costs,
trace spans, progress lines, and the files the program writes. Imports nothing of the
package above it (and no array module, no MPI transport).
"""
