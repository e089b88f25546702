"""tbps_compress.export"""
