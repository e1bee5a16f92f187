"""The operator's reset confirmation as a std_srvs/Trigger service (`reset/confirm` by default).

`TriggerConfirm(node)` is the `confirm` source of robolearn.hardware.resets.OperatorReset: a reset waits
until the operator runs `ros2 service call /reset/confirm std_srvs/srv/Trigger`. A call while no reset
waits is answered `success: false`, so a stray call never confirms the next reset in advance.
"""

from __future__ import annotations

import threading

from std_srvs.srv import Trigger

from robolearn.ros.ros_backend import wait_until

CONFIRM_SERVICE = "reset/confirm"


class TriggerConfirm:
    """`confirm(timeout) -> bool`: True once the Trigger service is called while a reset waits."""

    def __init__(self, node, service: str = CONFIRM_SERVICE, callback_group=None):
        self.node = node
        self.service = node.create_service(Trigger, service, self._on_call, callback_group=callback_group)
        self.name = f"service {node.resolve_service_name(service)} (std_srvs/Trigger)"
        self._lock = threading.Lock()
        self._waiting = False
        self._confirmed = threading.Event()

    def _on_call(self, request, response):
        with self._lock:
            if self._waiting and not self._confirmed.is_set():
                self._confirmed.set()
                response.success, response.message = True, "reset confirmed"
            else:
                response.success, response.message = False, "no reset is waiting for confirmation"
        self.node.get_logger().info(f"{self.name}: {response.message}")
        return response

    def __call__(self, timeout: float) -> bool:
        with self._lock:
            self._confirmed.clear()
            self._waiting = True
        self.node.get_logger().info(f"waiting up to {timeout:g} s for the operator: "
                                    f"ros2 service call {self.service.srv_name} std_srvs/srv/Trigger")
        try:
            return wait_until(self.node, self._confirmed.is_set, timeout)
        finally:
            with self._lock:
                self._waiting = False

    def close(self) -> None:
        self.node.destroy_service(self.service)
