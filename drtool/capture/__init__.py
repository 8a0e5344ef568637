"""Continuous attachment capture: new ``attachments`` rows followed by id, their objects
sealed into content blobs, a signed chain of encrypted journals (ADR 0025).
"""
