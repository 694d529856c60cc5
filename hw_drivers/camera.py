"""``camera`` node: OpenCV ``VideoCapture`` (device index, stream URL or video file) -> ROS 2 images.

Publishes (REP 2003 sensor-driver QoS: reliable, volatile, keep last 5, so best-effort (SensorDataQoS) and reliable
subscribers both receive; per topic ``qos_overrides.<topic>.publisher.<reliability|durability|history|depth>``
parameters, e.g. ``reliability: best_effort``; :func:`robot_rl.ros.common.qos_publisher`)
  /cameras/<camera_name>/image_raw              sensor_msgs/Image rgb8 (resized to ``output_width`` x ``output_height`` when set)
  /cameras/<camera_name>/image_raw/compressed   sensor_msgs/CompressedImage jpeg (``publish_compressed``)
  /cameras/<camera_name>/camera_info            sensor_msgs/CameraInfo from ``calibration_file`` (the YAML written by
                                                ROS camera_calibration: image_width, image_height, camera_matrix,
                                                distortion_model, distortion_coefficients, rectification_matrix,
                                                projection_matrix), intrinsics scaled to the published size; all
                                                zeros (= uncalibrated, ROS convention) without a file
  /diagnostics                                  connected / fps / frames / reconnects / read failures (1 Hz)

``source``: ``"0"`` (device index), ``rtsp://...`` / ``http://...`` (stream) or a file path. Files play at ``rate``
frames per second and restart at the end when ``loop``; devices and streams are read as fast as they deliver and
published at most at ``rate``. When reading fails (device unplugged, stream down, file ended without ``loop``) the
node reports ERROR on /diagnostics and tries to reopen every ``reconnect_period`` seconds. Stamps: the system
clock at capture (the node clock, so use_sim_time is honoured).

    python -m robot_rl.hw_drivers.camera --ros-args -p source:=0 -p camera_name:=front -p output_width:=96 -p output_height:=96
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import yaml

from robot_rl.errors import ConfigError
from robot_rl.ros.common import (COMMAND_QOS, SENSOR_PUBLISHER_QOS, declare, diagnostic, image_to_msg, qos_publisher,
                                 run_node)


def load_calibration(path: str) -> dict:
    """Read a ROS camera_calibration YAML. Raises ConfigError naming the missing field."""
    try:
        d = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError("calibration_file", f"cannot read {path} ({e.strerror})", "pass an existing YAML file") from None
    if not isinstance(d, dict):
        raise ConfigError("calibration_file", f"{path} is not a YAML mapping", "use camera_calibration's format")
    for k in ("image_width", "image_height"):
        v = d.get(k)
        if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            raise ConfigError(f"calibration_file.{k}", "missing" if v is None else f"{v!r} is not a positive "
                              "integer", "use the YAML written by ROS camera_calibration (the calibrated size)")
    for k, n in (("camera_matrix", 9), ("distortion_coefficients", None), ("rectification_matrix", 9),
                 ("projection_matrix", 12)):
        if k not in d and k in ("rectification_matrix", "projection_matrix"):
            continue  # optional
        data = d[k].get("data") if isinstance(d.get(k), dict) else None
        if not (isinstance(data, list) and all(isinstance(x, (int, float)) for x in data) and (n is None or
                                                                                              len(data) == n)):
            raise ConfigError(f"calibration_file.{k}", "missing" if k not in d else "needs {rows, cols, data: "
                              f"[{n or 'N'} numbers]}}", "use the YAML written by ROS camera_calibration")
    return d


def camera_info(calib: dict | None, height: int, width: int, stamp, frame_id: str):
    """CameraInfo for an image of (height, width): calibration intrinsics scaled from the calibrated size."""
    from sensor_msgs.msg import CameraInfo

    m = CameraInfo()
    m.header.stamp, m.header.frame_id = stamp, frame_id
    m.height, m.width = int(height), int(width)
    if calib is None:
        m.distortion_model = ""
        return m
    sx, sy = width / float(calib["image_width"]), height / float(calib["image_height"])
    S = np.diag([sx, sy, 1.0])
    K = S @ np.array(calib["camera_matrix"]["data"], float).reshape(3, 3)
    P = np.array(calib.get("projection_matrix", {}).get("data", [*K[0], 0, *K[1], 0, *K[2], 0]), float).reshape(3, 4)
    if "projection_matrix" in calib:
        P = S @ P
    m.k = [float(v) for v in K.ravel()]
    m.p = [float(v) for v in P.ravel()]
    m.r = [float(v) for v in calib.get("rectification_matrix", {}).get("data", [1, 0, 0, 0, 1, 0, 0, 0, 1])]
    m.d = [float(v) for v in calib["distortion_coefficients"]["data"]]
    m.distortion_model = calib.get("distortion_model", "plumb_bob")
    return m


def make_node():
    import cv2
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.node import Node
    from sensor_msgs.msg import CameraInfo, CompressedImage, Image

    class Camera(Node):
        def __init__(self):
            super().__init__("camera")
            self.source = str(declare(self, "source", "0", "device index, stream URL or video file"))
            self.name = declare(self, "camera_name", "camera", "topics go under /cameras/<camera_name>/")
            self.frame_id = declare(self, "frame_id", "", "image frame ('' = <camera_name>_optical_frame)") or \
                f"{self.name}_optical_frame"
            self.rate = float(declare(self, "rate", 30.0, "publish rate limit / file playback rate [Hz]",
                                      positive=True))
            self.loop = bool(declare(self, "loop", True, "restart a video file at its end"))
            # sizes in pixels, width before height as in sensor_msgs/CameraInfo and usb_cam; 0 = as delivered
            self.image_width = int(declare(self, "image_width", 0, "capture width requested from the device [px]"))
            self.image_height = int(declare(self, "image_height", 0, "capture height requested from the device [px]"))
            self.output_width = int(declare(self, "output_width", 0, "published width [px] (0 = as read)"))
            self.output_height = int(declare(self, "output_height", 0, "published height [px] (0 = as read)"))
            self.jpeg_quality = int(declare(self, "jpeg_quality", 90, "CompressedImage JPEG quality"))
            self.compressed = bool(declare(self, "publish_compressed", True, "also publish image_raw/compressed"))
            self.reconnect_period = float(declare(self, "reconnect_period", 1.0, "seconds between reopen tries",
                                                  positive=True))
            calib = declare(self, "calibration_file", "", "camera_calibration YAML ('' = uncalibrated)")
            self.calib = load_calibration(calib) if calib else None
            for pair in (("image_width", "image_height"), ("output_width", "output_height")):
                w, h = (getattr(self, k) for k in pair)
                if w < 0 or h < 0 or (w == 0) != (h == 0):
                    raise ConfigError(f"{pair[0]}/{pair[1]}", f"{w} x {h}",
                                      "set both to positive pixel counts (e.g. 96 and 96) or both to 0")
            self.is_file = not self.source.isdigit() and "://" not in self.source
            if self.is_file and not Path(self.source).is_file():
                raise ConfigError("source", f"{self.source} is neither a device index, a URL nor a file",
                                  "pass e.g. 0, rtsp://host/stream or /path/video.mp4")
            base = f"/cameras/{self.name}"
            self.pub_img = qos_publisher(self, Image, f"{base}/image_raw", SENSOR_PUBLISHER_QOS)
            self.pub_jpg = qos_publisher(self, CompressedImage, f"{base}/image_raw/compressed", SENSOR_PUBLISHER_QOS)
            self.pub_info = qos_publisher(self, CameraInfo, f"{base}/camera_info", SENSOR_PUBLISHER_QOS)
            self.pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", COMMAND_QOS)
            self.cv2, self._CompressedImage = cv2, CompressedImage
            self.cap = None
            self.stats = {"frames": 0, "reconnects": 0, "read_failures": 0}
            self.connected = False
            self._fps_t, self._fps_n, self.fps = time.monotonic(), 0, 0.0
            self._stop = threading.Event()
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()
            self.create_timer(1.0, self._diag)
            if self.calib is None:
                self.get_logger().warning("no calibration_file: camera_info carries zero intrinsics (uncalibrated)")

        def _open(self) -> bool:
            cv2 = self.cv2
            src = int(self.source) if self.source.isdigit() else self.source
            cap = cv2.VideoCapture(src)
            if not cap.isOpened():
                return False
            if self.image_width > 0:
                cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.image_width)
                cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.image_height)
            self.cap = cap
            return True

        def _run(self):
            period = 1.0 / self.rate
            next_t = time.monotonic()
            while not self._stop.is_set():
                if self.cap is None:
                    if self._open():
                        self.connected = True
                        self.get_logger().info(f"opened {self.source}")
                    else:
                        self.connected = False
                        self._stop.wait(self.reconnect_period)
                        continue
                ok, frame = self.cap.read()
                if not ok and self.is_file and self.loop:
                    self.cap.set(self.cv2.CAP_PROP_POS_FRAMES, 0)
                    ok, frame = self.cap.read()
                if not ok:
                    self.stats["read_failures"] += 1
                    self.connected = False
                    self.cap.release()
                    self.cap = None
                    self.stats["reconnects"] += 1
                    self.get_logger().error(f"reading {self.source} failed; reopening every {self.reconnect_period} s",
                                            throttle_duration_sec=5.0)
                    self._stop.wait(self.reconnect_period)
                    continue
                now = time.monotonic()
                if now < next_t:
                    if self.is_file:
                        self._stop.wait(next_t - now)  # play files at `rate`
                    else:
                        continue  # live source: drop frames above `rate`
                next_t = max(next_t + period, time.monotonic() - period)
                self._publish(frame)

        def _publish(self, bgr):
            cv2 = self.cv2
            w, h = self.output_width, self.output_height
            if w > 0 and bgr.shape[:2] != (h, w):
                bgr = cv2.resize(bgr, (w, h), interpolation=cv2.INTER_AREA)
            stamp = self.get_clock().now().to_msg()
            self.pub_img.publish(image_to_msg(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), stamp, self.frame_id))
            if self.compressed:
                ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
                if ok:
                    m = self._CompressedImage()
                    m.header.stamp, m.header.frame_id, m.format = stamp, self.frame_id, "rgb8; jpeg compressed bgr8"
                    m.data = buf.tobytes()
                    self.pub_jpg.publish(m)
            self.pub_info.publish(camera_info(self.calib, bgr.shape[0], bgr.shape[1], stamp, self.frame_id))
            self.stats["frames"] += 1
            self._fps_n += 1
            self.connected = True

        def _diag(self):
            now = time.monotonic()
            self.fps, self._fps_t, self._fps_n = self._fps_n / max(now - self._fps_t, 1e-6), now, 0
            level = 0 if self.connected else 2
            self.pub_diag.publish(diagnostic(f"camera: {self.name}", self.source, level,
                                             "streaming" if self.connected else "disconnected: reconnecting",
                                             {"fps": self.fps, "connected": self.connected, **self.stats},
                                             self.get_clock().now().to_msg()))

        def close(self):
            self._stop.set()
            self.thread.join(timeout=2.0)
            if self.cap is not None:
                self.cap.release()

    return Camera()


def main(args=None) -> int:
    return run_node(make_node, args)


if __name__ == "__main__":
    raise SystemExit(main())
