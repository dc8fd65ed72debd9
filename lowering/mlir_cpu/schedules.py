def run_embedded_schedule(module):
    pass
