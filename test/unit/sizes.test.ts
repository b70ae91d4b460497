import t from 'tap';
import { parseSize } from '../../daemon/sizes.js';
t.equal(parseSize('16m'), 16n << 20n);
t.equal(parseSize('1G'), 1n << 30n);
t.equal(parseSize('512'), 512n);
t.throws(() => parseSize('12x'));
