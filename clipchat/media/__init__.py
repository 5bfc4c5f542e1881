"""Media building blocks shared by the composer and the regenerator.

``ffmpeg`` runs the ffmpeg binary (progress, cancellation, errors), ``probe`` reads what a file
holds with PyAV, ``encoder`` picks NVENC or libx264 and their arguments, ``thumbnail`` renders
clip stills.
"""
