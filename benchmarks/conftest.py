"""Records the device, library versions and backends in ``--benchmark-json``'s machine_info."""

import torch

from fastlora.bench import report


def pytest_benchmark_update_machine_info(config, machine_info):
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    machine_info["fastlora"] = {device: report.machine_info(device) for device in devices}
