"""tbps_compress.bench"""
