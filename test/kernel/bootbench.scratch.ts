import { runGuest } from '/work/main/test/helpers/vm.js';
const r = await runGuest({ script: 'true', timeoutMs: 60_000, log: '/tmp/bench.log' });
console.log(process.env.COWBD_GUEST_APPEND ?? '-', r.exitCode, 'init', r.initMs, 'marker', r.exitMarkerMs, 'wall', r.wallMs, 'uptime', r.uptime.init);
