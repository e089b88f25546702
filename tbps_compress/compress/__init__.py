"""tbps_compress.compress"""
