"""tbps_compress.models"""
