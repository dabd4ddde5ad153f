# pvh_info: prints what the VMM handed over in the PVH hvm_start_info (EBX at entry), so tests
# can check the boot protocol without Linux, then powers off:
#   PASS start-info-magic            (or FAIL start-info-magic got=XX, low byte, and stop)
#   version=N
#   cmdline=<the command line, or empty when cmdline_paddr is 0>
#   rsdp=XXXXXXXXXXXXXXXX
#   memmap=N
#   XXXXXXXXXXXXXXXX XXXXXXXXXXXXXXXX T     (address, size, type: one line per entry)
#   DONE
	.code32
	.include "common.inc"

	.set HVM_START_MAGIC, 0x336ec578
	.set SI_MAGIC, 0
	.set SI_VERSION, 4
	.set SI_CMDLINE, 24
	.set SI_RSDP, 32
	.set SI_MEMMAP, 40
	.set SI_MEMMAP_ENTRIES, 48
	.set MEMMAP_ENTRY_SIZE, 24
	.set MEMMAP_LIMIT, 128

	program_start
	call uart_init
	mov start_info, %ebx
	mov SI_MAGIC(%ebx), %eax
	cmp $HVM_START_MAGIC, %eax
	jne bad_magic
	mov $0x78, %al
	check start-info-magic, 0x78

	mov $msg_version, %esi
	call puts
	mov SI_VERSION(%ebx), %eax
	call putdec
	call newline

	mov $msg_cmdline, %esi
	call puts
	mov SI_CMDLINE(%ebx), %esi
	test %esi, %esi
	jz 1f
	call puts
1:	call newline

	mov $msg_rsdp, %esi
	call puts
	lea SI_RSDP(%ebx), %esi
	call puthex64
	call newline

	# memmap fields exist from version 1 on
	xor %ecx, %ecx
	cmpl $1, SI_VERSION(%ebx)
	jb 2f
	mov SI_MEMMAP_ENTRIES(%ebx), %ecx
2:	mov $msg_memmap, %esi
	call puts
	mov %ecx, %eax
	call putdec
	call newline
	cmp $MEMMAP_LIMIT, %ecx
	jbe 3f
	mov $MEMMAP_LIMIT, %ecx
3:	test %ecx, %ecx
	jz 5f
	mov SI_MEMMAP(%ebx), %edi
4:	mov %edi, %esi
	call puthex64
	mov $' ', %al
	call putc
	lea 8(%edi), %esi
	call puthex64
	mov $' ', %al
	call putc
	mov 16(%edi), %eax
	call putdec
	call newline
	add $MEMMAP_ENTRY_SIZE, %edi
	dec %ecx
	jnz 4b
5:	mov $msg_done, %esi
	call puts
	jmp poweroff

bad_magic:
	check start-info-magic, 0x78
	mov $msg_done, %esi
	call puts
	jmp poweroff

# puthex64: send the little-endian u64 at esi as 16 hex digits.
puthex64:
	push %eax
	mov 4(%esi), %eax
	call puthex32
	mov (%esi), %eax
	call puthex32
	pop %eax
	ret

newline:
	push %eax
	mov $'\n', %al
	call putc
	pop %eax
	ret

	.section .rodata
msg_version:
	.asciz "version="
msg_cmdline:
	.asciz "cmdline="
msg_rsdp:
	.asciz "rsdp="
msg_memmap:
	.asciz "memmap="
msg_done:
	.asciz "DONE\n"
