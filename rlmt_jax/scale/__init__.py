"""Running on many devices and hosts: the device mesh and partition rules, what the processes of a
multi-host run agree on, the persistent compilation cache, the CPU relaunch with reused host memory."""
