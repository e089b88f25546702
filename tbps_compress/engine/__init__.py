"""tbps_compress.engine"""
